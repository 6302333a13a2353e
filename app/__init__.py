"""The `hsplitlora` command and the demo supervisor: the layer above the core (`hsplitlora`), the
device SDK (`edge_sdk`), the server (`server`) and `export`, which it composes and none of which
imports it (docs/architecture.md)."""
