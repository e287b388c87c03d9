"""DevOps Agent billing console: the domain core. Never imports streamlit."""
