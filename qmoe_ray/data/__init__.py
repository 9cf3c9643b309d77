"""qmoe_ray.data"""
