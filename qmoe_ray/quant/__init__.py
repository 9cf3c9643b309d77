"""qmoe_ray.quant"""
