import os

# Tests run on the CPU with the project's fp32 numerics; keep XLA from grabbing every thread
# so parallel test processes and the machine's two cores are shared fairly.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
