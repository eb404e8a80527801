import sys

from twinmerge_ext.demo.run import main

sys.exit(main())
