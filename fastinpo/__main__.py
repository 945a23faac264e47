import sys

from fastinpo.cli import main

sys.exit(main())
