"""qmoe_ray.storage"""
