# bash completion for llmctl (llm-residentd). `llmctl completion bash` prints this file.
# Candidates come from llmctl itself (`llmctl __complete`): its subcommands and options,
# and model and policy names asked from the daemon (none when it is down).
_llmctl() {
    local IFS=$'\n'
    COMPREPLY=($("${COMP_WORDS[0]}" __complete "$COMP_CWORD" "${COMP_WORDS[@]}" 2>/dev/null))
}
complete -o default -F _llmctl llmctl
