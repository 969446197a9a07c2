"""`python -m llama_deploy_ray ...` is the `llama-deploy-ray` command."""

from llama_deploy_ray._cli.main import main

main()
