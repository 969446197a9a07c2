"""Terminal 1: the core (control plane, orchestrator, message queue) on Ray.

Starts a local Ray in this process when no cluster is running and stays up with it.
"""

from llama_deploy_ray import (
    ControlPlaneConfig,
    SimpleMessageQueueConfig,
    deploy_core,
)


async def main():
    await deploy_core(
        control_plane_config=ControlPlaneConfig(),
        message_queue_config=SimpleMessageQueueConfig(),
    )


if __name__ == "__main__":
    import asyncio

    asyncio.run(main())
