from piarec.cli import main

raise SystemExit(main())
