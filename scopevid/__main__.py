import sys

from scopevid.cli import main

sys.exit(main())
