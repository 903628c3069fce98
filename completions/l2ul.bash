_l2ul_completion() {
    local IFS=$'
'
    COMPREPLY=( $( env COMP_WORDS="${COMP_WORDS[*]}" \
                   COMP_CWORD=$COMP_CWORD \
                   _L2UL_COMPLETE=complete_bash $1 ) )
    return 0
}

complete -o default -F _l2ul_completion l2ul
