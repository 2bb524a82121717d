# Runs at every boot, after boot.py: the NodeLink node (app.py, config.json).
import app

app.main()
