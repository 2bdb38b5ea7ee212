"""spaces_demo"""
