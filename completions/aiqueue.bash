_aiqueue_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _AIQUEUE_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _aiqueue_completion aiqueue
# Generated from the aiqueue app by `python -m aiqueue.cli.completions`; do not edit.
