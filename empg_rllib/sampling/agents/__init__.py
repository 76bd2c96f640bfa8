"""A user's own agent as the rollout: the chat endpoint that serves the runner's engine and
records every call (`endpoint`), and the rollout that runs the agents against it (`rollout`).
The registry of agent ids is `empg_rllib.config.agents`."""
