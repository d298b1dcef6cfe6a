"""The weckd coordinator: Flower ServerApp, chain schedule, metrics and the weckd-server CLI."""
