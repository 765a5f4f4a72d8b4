"""Geometry on the GPU: FPS, marching cubes, mesh clean-up, components."""
