"""``python -m hq_lightning.quantization.ops [PATH]``: write ``docs/operators.md`` (stdout without PATH)."""

from hq_lightning.quantization.ops.docs import main

raise SystemExit(main())
