"""dupmae.engine"""
