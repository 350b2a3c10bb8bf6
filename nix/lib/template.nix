# Corral templates in Nix: `readTemplate path` validates a template TOML file and
# returns what Python's `load_template(path).normalized()` returns, or throws the
# same TemplateError text for the same first mistake. Builtins only.
#
# Fields are checked in Template's declaration order, nested models field by field,
# unknown fields after the known ones, then the whole-template rules: the order in
# which pydantic reports them.
let
  inherit (builtins)
    attrNames
    elem
    filter
    foldl'
    isAttrs
    length
    listToAttrs
    map
    mapAttrs
    seq
    sort
    ;
  errors = import ./errors.nix;
  c = import ./coerce.nix;

  at = ctx: key: ctx // { loc = ctx.loc ++ [ key ]; };
  defaultsCtx = {
    file = "<defaults>";
    loc = [ ];
  };

  # A pydantic model with extra="forbid": `fields` is an ordered list of
  # { name, check, default? }. The result is the validated attrset, and its
  # evaluation reports the first error in pydantic's order.
  model =
    modelName: fields: ctx: raw:
    let
      names = map (f: f.name) fields;
      value =
        f:
        if raw ? ${f.name} then
          f.check (at ctx f.name) raw.${f.name}
        else if f ? default then
          f.default
        else
          errors.failAs "missing" (at ctx f.name) "is required";
      values = map value fields;
      extras = filter (n: !elem n names) (attrNames raw);
      checked = foldl' (acc: v: seq v acc) true values;
      result = listToAttrs (
        builtins.genList (i: {
          name = builtins.elemAt names i;
          value = builtins.elemAt values i;
        }) (length fields)
      );
    in
    if !isAttrs raw then
      errors.fail ctx "Input should be a valid dictionary or instance of ${modelName}"
    else
      seq checked (
        if extras != [ ] then
          errors.failAs "extra" (at ctx (builtins.head extras)) "unknown field '${builtins.head extras}'"
        else
          result
      );

  # Field(...) with a type check and then a field validator (`after`).
  field = name: check: { inherit name check; };
  optional =
    name: default: check:
    {
      inherit name default check;
    };
  pipe = checks: ctx: v: foldl' (acc: check: check ctx acc) v checks;
  validate = pred: message: ctx: v: if pred v then v else errors.fail ctx (message v);

  name = validate (c.matchesLine "[a-z0-9][a-z0-9_.-]{0,62}") (
    v: "'${v}' is not a name: use a-z, 0-9, '.', '_', '-' (max 63)"
  );

  user = model "User" [
    (optional "name" "sandbox" c.str)
    (optional "uid" 1000 (pipe [
      c.int
      (c.bounded {
        lt = 65536;
        ge = 0;
      })
    ]))
    (optional "gid" 1000 (pipe [
      c.int
      (c.bounded {
        lt = 65536;
        ge = 0;
      })
    ]))
  ];

  resources = model "Resources" [
    (optional "vcpus" 1.0 (pipe [
      c.float
      (c.bounded {
        le = 256;
        gt = 0;
      })
    ]))
    (optional "memory" 536870912 (pipe [
      c.size
      (c.bounded { ge = 16777216; })
    ]))
    (optional "pids" 256 (pipe [
      c.int
      (c.bounded {
        le = 4194304;
        ge = 8;
      })
    ]))
    (optional "disk" 268435456 (pipe [
      c.size
      (c.bounded { ge = 1048576; })
    ]))
    (optional "cpuset" null (pipe [
      c.str
      (validate (c.fullMatch "[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*") (
        v: "'${v}' is not a CPU list like '0', '0-1' or '0,2'"
      ))
    ]))
  ];

  fileEntry = model "FileEntry" [
    (field "path" (pipe [
      c.str
      c.absolutePath
    ]))
    (field "content" c.str)
    (optional "mode" "0644" (pipe [
      c.str
      (validate (c.fullMatch "0?[0-7]{3,4}") (
        v: "'${v}' is not an octal file mode like '0644' or '0755'"
      ))
    ]))
  ];

  mountSource =
    ctx: v:
    if builtins.substring 0 1 v == "@" then
      (
        if v == "@rust-sysroot" then
          v
        else
          errors.fail ctx "unknown special source '${v}' (known: @rust-sysroot)"
      )
    else
      c.absolutePath ctx v;

  mountTarget =
    ctx: v:
    let
      path = c.absolutePath ctx v;
      second = builtins.elemAt (builtins.filter builtins.isString (builtins.split "/" path)) 1;
    in
    if path == "/" || elem second [ "proc" "sys" "dev" ] then
      errors.fail ctx "'${path}' is reserved for the runtime"
    else
      path;

  mount = model "Mount" [
    (field "source" (pipe [
      c.str
      mountSource
    ]))
    (field "target" (pipe [
      c.str
      mountTarget
    ]))
    (optional "optional" false c.bool)
  ];

  env =
    ctx: v:
    let
      values = mapAttrs (key: value: c.str (at ctx key) value) v;
      badKeys = filter (key: !c.matchesLine "[A-Za-z_][A-Za-z0-9_]*" key) (attrNames v);
    in
    if !isAttrs v then
      errors.fail ctx "Input should be a valid dictionary"
    else
      seq (c.strictList (builtins.attrValues values)) (
        if badKeys != [ ] then
          errors.fail ctx "'${builtins.head badKeys}' is not an environment variable name"
        else
          values
      );

  packages = pipe [
    (c.list c.str)
    (validate (ps: builtins.all (c.matchesLine "[a-z0-9][a-z0-9+.-]+") ps) (
      ps:
      "'${
        builtins.head (filter (p: !c.matchesLine "[a-z0-9][a-z0-9+.-]+" p) ps)
      }' is not a Debian package name"
    ))
    (_: ps: uniqueSorted ps)
  ];

  isolation = pipe [
    (c.list (c.literal [
      "container"
      "gvisor"
      "microvm"
    ]))
    (validate (levels: levels != [ ]) (_: "at least one isolation level must be allowed"))
    (_: levels: uniqueInOrder levels)
  ];

  uniqueSorted =
    xs:
    foldl' (acc: x: if acc != [ ] && builtins.elemAt acc (length acc - 1) == x then acc else acc ++ [ x ]) [ ] (
      sort builtins.lessThan xs
    );
  uniqueInOrder = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];

  port = pipe [
    c.int
    (c.bounded {
      le = 65535;
      ge = 1;
    })
  ];

  volume = model "Volume" [
    (optional "size" 268435456 (pipe [
      c.size
      (c.bounded { ge = 1048576; })
    ]))
    (optional "path" "/data" (pipe [
      c.str
      mountTarget
    ]))
  ];

  # HealthCheck, then its model validator (reported at the health table).
  healthCheck = pipe [
    (model "HealthCheck" [
      (optional "exec" null (c.list c.str))
      (optional "tcp" null port)
      (optional "interval" 10.0 (pipe [
        c.float
        (c.bounded { gt = 0; })
      ]))
      (optional "timeout" 2.0 (pipe [
        c.float
        (c.bounded { gt = 0; })
      ]))
      (optional "retries" 3 (pipe [
        c.int
        (c.bounded { ge = 1; })
      ]))
    ])
    (validate (h: (h.exec == null) != (h.tcp == null) && h.exec != [ ]) (
      _: "give exactly one of exec (a command) or tcp (a port)"
    ))
  ];

  service = model "Service" [
    (field "command" (pipe [
      (c.list c.str)
      (validate (cmd: cmd != [ ]) (_: "the command must name a program"))
    ]))
    (optional "env" { } env)
    (optional "ports" [ ] (c.list port))
    (optional "restart" "always" (c.literal [
      "always"
      "on-failure"
    ]))
    (optional "backoff" 1.0 (pipe [
      c.float
      (c.bounded { gt = 0; })
    ]))
    (optional "max_backoff" 60.0 (pipe [
      c.float
      (c.bounded { gt = 0; })
    ]))
    (optional "crash_limit" 5 (pipe [
      c.int
      (c.bounded { ge = 1; })
    ]))
    (optional "health" null healthCheck)
  ];

  template = model "Template" [
    (field "name" (pipe [
      c.str
      name
    ]))
    (optional "description" "" c.str)
    (optional "base" "host" (pipe [
      c.str
      (validate (b: elem b bases) (b: "unknown base '${b}'"))
    ]))
    (optional "packages" [ ] packages)
    (optional "files" [ ] (c.list fileEntry))
    (optional "env" { } env)
    (optional "workdir" "/work" (pipe [
      c.str
      c.absolutePath
    ]))
    (optional "user" (user defaultsCtx { }) user)
    (optional "resources" (resources defaultsCtx { }) resources)
    (optional "network" "none" (c.literal [
      "none"
      "egress"
    ]))
    (optional "mounts" [ ] (c.list mount))
    (optional "isolation" [
      "container"
      "gvisor"
      "microvm"
    ] isolation)
    (optional "kind" "ephemeral" (c.literal [
      "ephemeral"
      "persistent"
    ]))
    (optional "timeout" 600 (pipe [
      c.int
      (c.bounded { ge = 1; })
    ]))
    (optional "volume" null volume)
    (optional "service" null service)
  ];

  bases = [
    "host"
    "debian:bookworm"
    "busybox"
  ];

  # Template._consistent, then Template.normalized()'s sort of files by path.
  consistent =
    ctx: t:
    let
      paths = map (f: f.path) t.files;
    in
    if t.packages != [ ] && t.base != "debian:bookworm" then
      errors.fail ctx "packages need base 'debian:bookworm' (this template's base is '${t.base}')"
    else if length (uniqueSorted paths) != length paths then
      errors.fail ctx "two [[files]] entries have the same path"
    else
      t // { files = sort (a: b: a.path < b.path) t.files; };

  # parseTemplate { source = "where it came from"; } data: validate already parsed
  # TOML data (like corral.spec.template.parse_template(...).normalized()).
  parseTemplate =
    { source }:
    data:
    let
      ctx = {
        file = source;
        loc = [ ];
      };
    in
    consistent ctx (template ctx data);

  readTemplate =
    path:
    let
      source = toString path;
    in
    parseTemplate { inherit source; } (
      builtins.addErrorContext "while reading the Corral template ${source}" (
        builtins.fromTOML (builtins.readFile path)
      )
    );
in
{
  inherit parseTemplate readTemplate bases;
  parseSize =
    source: value:
    c.size {
      file = source;
      loc = [ ];
    } value;
  # A template with every default filled, as for `name = "sandbox"`.
  defaults = parseTemplate { source = "<defaults>"; } { name = "sandbox"; };
}
