"""qmoe_ray.gpu"""
