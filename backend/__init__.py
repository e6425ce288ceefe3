"""burrow's engine: the edge, the agent, their APIs and stores.  Never imports ``console``."""

__version__ = "0.1.0"
