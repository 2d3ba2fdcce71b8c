"""dupmae.data_pipeline"""
