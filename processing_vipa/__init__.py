"""processing_vipa"""
