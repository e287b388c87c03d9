"""Streamlit helpers for Home.py and pages/: the sign-in gate, the mode banner, cached reads and
formatting. This package may import streamlit; billing_core never does."""
