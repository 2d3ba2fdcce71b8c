"""dupmae.cluster"""
