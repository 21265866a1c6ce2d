import sys

from evalsuite.commands.cli import main

sys.exit(main())
