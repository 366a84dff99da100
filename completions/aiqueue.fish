complete --command aiqueue --no-files --arguments "(env _AIQUEUE_COMPLETE=complete_fish _TYPER_COMPLETE_FISH_ACTION=get-args _TYPER_COMPLETE_ARGS=(commandline -cp) aiqueue)" --condition "env _AIQUEUE_COMPLETE=complete_fish _TYPER_COMPLETE_FISH_ACTION=is-args _TYPER_COMPLETE_ARGS=(commandline -cp) aiqueue"
# Generated from the aiqueue app by `python -m aiqueue.cli.completions`; do not edit.
