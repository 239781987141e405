# Sourced by the launch scripts: `show CMD ARGS...` prints a command so that it can be pasted into a
# shell as is (single quotes where needed).
show() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+="$arg "; else out+="'${arg//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
