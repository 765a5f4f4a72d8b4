"""X-Part: part generation (ShapeVAE, conditioner, MoE DiT, scheduler, pipeline)."""
