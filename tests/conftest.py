"""The test session runs Paddle as the entry points do: with the runtime set up before it loads."""
from convitlab import runtime

runtime.setup()
