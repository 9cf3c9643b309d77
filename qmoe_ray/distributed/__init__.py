"""qmoe_ray.distributed"""
