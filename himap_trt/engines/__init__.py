"""TensorRT engines: optimization profiles, the static compatibility check, building, and the
engines manifest. Nothing here imports TensorRT at module level."""
