"""Reading checkpoints and adapters, writing them atomically. PEFT key naming lives in adapter.py."""
