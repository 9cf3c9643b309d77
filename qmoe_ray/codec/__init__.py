"""qmoe_ray.codec"""
