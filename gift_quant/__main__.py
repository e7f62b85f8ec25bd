import sys

from gift_quant.cli import main

sys.exit(main())
