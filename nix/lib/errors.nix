# Template errors worded exactly like corral.errors.TemplateError:
#   "<file>: field '<a.b>': <message>\nfix: <hint>"  (or "<file>: <message>\nfix: <hint>")
# The hints are those of corral/spec/template.py (_HINTS); keep the two in step.
let
  inherit (builtins) concatStringsSep head map toString;

  # Template's fields in declaration order: the order Python validates (and reports) them.
  knownFields = [
    "name"
    "description"
    "base"
    "packages"
    "files"
    "env"
    "workdir"
    "user"
    "resources"
    "network"
    "mounts"
    "isolation"
    "kind"
    "timeout"
    "volume"
    "service"
  ];

  hints = {
    name = "set name = \"my-template\" (lowercase letters, digits, '.', '_', '-')";
    base = "set base to one of: host, debian:bookworm, busybox";
    packages = "list Debian package names and set base = \"debian:bookworm\"";
    files = "each [[files]] needs an absolute path, content, and an octal mode like \"0644\"";
    env = "use [env] with NAME = \"value\" string pairs";
    workdir = "use an absolute path such as \"/work\"";
    user = "use [user] with name, and uid/gid between 0 and 65535";
    resources = "e.g. [resources] vcpus = 1, memory = \"512M\", pids = 256, disk = \"256M\"";
    network = "set network to \"none\" or \"egress\"";
    mounts = "each [[mounts]] needs an absolute source (or @rust-sysroot) and target";
    isolation = "list one or more of: container, gvisor, microvm";
    kind = "set kind to \"ephemeral\" or \"persistent\"";
    timeout = "give the default timeout in whole seconds, at least 1";
    volume = "e.g. [volume] size = \"256M\", path = \"/data\"";
    service = "e.g. [service] command = [\"/data/app\"], restart = \"always\"; [service.health] tcp = 7000 or exec = [...]";
  };

  # kind: "missing" (a required field is absent), "extra" (an unknown field) or
  # "value" (anything else), which pick the hint as parse_template does.
  format =
    {
      file,
      loc ? [ ],
      kind ? "value",
      message,
    }:
    let
      field = if loc == [ ] then null else concatStringsSep "." (map toString loc);
      top = if loc == [ ] then "" else toString (head loc);
      hint =
        if kind == "extra" then
          "remove it or fix its spelling; known fields: " + concatStringsSep ", " knownFields
        else if kind == "missing" then
          hints.${top} or "add '${field}'"
        else
          hints.${top} or "see the Templates section of the README";
      location = if field == null then file else "${file}: field '${field}'";
    in
    "${location}: ${message}\nfix: ${hint}";
in
{
  inherit knownFields hints format;

  # fail ctx message: throw for the value at ctx.loc ({ file, loc }).
  fail = ctx: message: throw (format (ctx // { inherit message; }));
  failAs =
    kind: ctx: message:
    throw (format (ctx // { inherit kind message; }));
}
