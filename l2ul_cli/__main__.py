from .cli import app

app(prog_name="l2ul")
