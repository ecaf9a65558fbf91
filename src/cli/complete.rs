//! Shell completions: clap's, plus VM names from the running daemon
//! (`qmpmux status --names`) where a subcommand takes a VM: bash, zsh and
//! fish. The names are asked of the daemon each time, through the
//! `--control`/`--config` on the line being completed, else
//! `QMPMUX_CONTROL`, else the default; when it cannot be reached, nothing
//! is offered.

use clap::Command;

/// The id of the positional argument that names a VM.
pub const VM_ARG: &str = "vm";

/// Subcommands whose first positional argument is a VM, and the options
/// of each that take a value (whose value is not a positional word).
fn vm_subcommands(cmd: &Command) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for sub in cmd.get_subcommands() {
        let takes_vm = sub
            .get_positionals()
            .next()
            .is_some_and(|a| a.get_id().as_str() == VM_ARG);
        if !takes_vm {
            continue;
        }
        let mut valued = Vec::new();
        for arg in sub
            .get_arguments()
            .chain(cmd.get_arguments().filter(|a| a.is_global_set()))
        {
            if arg.is_positional() || !arg.get_action().takes_values() {
                continue;
            }
            if let Some(long) = arg.get_long() {
                valued.push(format!("--{long}"));
            }
            if let Some(short) = arg.get_short() {
                valued.push(format!("-{short}"));
            }
        }
        out.push((sub.get_name().to_owned(), valued));
    }
    out
}

/// clap's script for `shell` with VM names added.
pub fn script(shell: clap_complete::Shell, cmd: &mut Command) -> String {
    let mut buf = Vec::new();
    clap_complete::generate(shell, cmd, "qmpmux", &mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    cmd.build();
    let subs = vm_subcommands(cmd);
    match shell {
        clap_complete::Shell::Bash => bash(&text, &subs),
        clap_complete::Shell::Zsh => zsh(&text),
        clap_complete::Shell::Fish => fish(&text, &subs),
        _ => text,
    }
}

fn bash(text: &str, subs: &[(String, Vec<String>)]) -> String {
    let names: Vec<&str> = subs.iter().map(|(s, _)| s.as_str()).collect();
    let mut valued: Vec<&str> = subs.iter().flat_map(|(_, v)| v.iter().map(String::as_str)).collect();
    valued.sort_unstable();
    valued.dedup();
    let wrapper = format!(
        r#"
# VM names from the running daemon where a subcommand takes a VM.
_qmpmux_vm() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" sub="" positional=0 i w
    local -a reach=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case "$w" in
            --control|--config|-c) reach+=("$w" "${{COMP_WORDS[i+1]}}") ;;
            --control=*|--config=*) reach+=("$w") ;;
        esac
        if [[ -z "$sub" ]]; then
            case "$w" in
                {subs}) sub="$w" ;;
                --config|-c|--demo-listen) ((i++)) ;;
                -*) ;;
                *) break ;;
            esac
        else
            case "$w" in
                {valued}) ((i++)) ;;
                -*) ;;
                *) ((positional++)) ;;
            esac
        fi
    done
    if [[ -n "$sub" && $positional -eq 0 && "$cur" != -* ]]; then
        COMPREPLY=( $(compgen -W "$("${{COMP_WORDS[0]}}" status --names "${{reach[@]}}" 2>/dev/null)" -- "$cur") )
        return 0
    fi
    _qmpmux "$@"
}}
"#,
        subs = names.join("|"),
        valued = valued.join("|"),
    );
    let text = text.replace("complete -F _qmpmux ", "complete -F _qmpmux_vm ");
    let at = text.find("\nif [[ \"${BASH_VERSINFO[0]}\" -eq 4").unwrap_or(text.len());
    format!("{}{wrapper}{}", &text[..at], &text[at..])
}

fn zsh(text: &str) -> String {
    let function = r#"
# VM names from the running daemon.
_qmpmux_vms() {
    local -a vms reach
    local i
    for ((i = 2; i < CURRENT; i++)); do
        case "$words[i]" in
            --control|--config|-c) reach+=("$words[i]" "$words[i+1]") ;;
            --control=*|--config=*) reach+=("$words[i]") ;;
        esac
    done
    vms=(${(f)"$(qmpmux status --names "${reach[@]}" 2>/dev/null)"})
    _describe -t vms 'VM' vms
}
"#;
    let mut out = String::with_capacity(text.len() + function.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.starts_with(&format!("':{VM_ARG} -- ")) {
            out.push_str(&line.replacen(":_default'", ":_qmpmux_vms'", 1));
        } else {
            out.push_str(line);
        }
        if i == 0 {
            out.push_str(function);
        }
    }
    out
}

fn fish(text: &str, subs: &[(String, Vec<String>)]) -> String {
    let names: Vec<&str> = subs.iter().map(|(s, _)| s.as_str()).collect();
    let mut valued: Vec<&str> = subs.iter().flat_map(|(_, v)| v.iter().map(String::as_str)).collect();
    valued.sort_unstable();
    valued.dedup();
    format!(
        r#"{text}
# VM names from the running daemon where a subcommand takes a VM.
function __fish_qmpmux_needs_vm
    set -l tokens (commandline -opc)
    set -l sub ""
    set -l skip 0
    for w in $tokens[2..-1]
        if test $skip -eq 1
            set skip 0
            continue
        end
        if test -z "$sub"
            if contains -- $w {subs}
                set sub $w
            else if contains -- $w --config -c --demo-listen
                set skip 1
            else if not string match -q -- '-*' $w
                return 1
            end
        else if contains -- $w {valued}
            set skip 1
        else if not string match -q -- '-*' $w
            return 1
        end
    end
    test -n "$sub"
end
function __fish_qmpmux_vms
    set -l tokens (commandline -opc)
    set -l reach
    for i in (seq 2 (count $tokens))
        switch $tokens[$i]
            case --control --config -c
                if test $i -lt (count $tokens)
                    set -a reach $tokens[$i] $tokens[(math $i + 1)]
                end
            case '--control=*' '--config=*'
                set -a reach $tokens[$i]
        end
    end
    qmpmux status --names $reach 2>/dev/null
end
complete -c qmpmux -n "__fish_qmpmux_needs_vm" -f -a "(__fish_qmpmux_vms)" -d VM
"#,
        subs = names.join(" "),
        valued = valued.join(" "),
    )
}
