"""`qlora ui`: a web UI over the CLI (Gradio), for people who do not live in a terminal.

workspace.py confines every file the UI touches to one folder; jobs.py runs the CLI's
commands as subprocesses, one at a time; forms.py turns the config schema into the Train
form; chat.py holds the Chat tab's model; app.py lays out the tabs and launches the server.
"""
