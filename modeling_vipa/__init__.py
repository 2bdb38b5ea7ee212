"""modeling_vipa"""
