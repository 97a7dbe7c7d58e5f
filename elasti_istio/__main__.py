from elasti_istio.cli import main

raise SystemExit(main())
