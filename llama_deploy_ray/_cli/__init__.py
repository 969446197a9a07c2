"""The `llama-deploy-ray` command line (see `main`)."""
