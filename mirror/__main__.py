import sys

from mirror.cli.main import main

sys.exit(main())
