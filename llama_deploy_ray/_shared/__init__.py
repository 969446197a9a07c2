"""The vocabulary both sides speak: configs, wire types, errors, events, the retry policy and
the adapter over llama-index workflows' internals. Imports nothing from `_client` or
`_cluster`."""
