# Pydantic's lax-mode coercions for the scalar types a Template uses, and the
# checks of corral/spec/{template,units}.py, with builtins only.
#
# Each check is `ctx: value: result`; ctx is { file, loc }. Evaluating the result
# either gives the coerced value or throws the TemplateError text (errors.nix).
let
  inherit (builtins)
    concatStringsSep
    elem
    elemAt
    filter
    floor
    fromJSON
    head
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isString
    length
    match
    replaceStrings
    split
    stringLength
    substring
    ;
  errors = import ./errors.nix;
  inherit (errors) fail;

  int64Max = 9223372036854775807;
  int64Min = -9223372036854775807 - 1;
  two63 = 9223372036854775808.0;
  inf = 1.0e308 * 10.0;
  tooLarge = ctx: fail ctx "is too large for Nix, whose integers are 64-bit";

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = replaceStrings upper lower;

  isFinite = x: x == x && x != inf && x != -inf;

  # Rust's str::trim for ASCII whitespace (what pydantic strips from numbers).
  strip =
    s:
    let
      m = match "[[:space:]]*([^[:space:]](.*[^[:space:]])?)[[:space:]]*" s;
    in
    if m == null then "" else head m;

  # A string of ASCII digits as an int; null when it does not fit in 64 bits.
  digitsToInt =
    digits:
    let
      significant = head (match "0*([0-9]+)" digits);
    in
    if stringLength significant > 18 then null else fromJSON significant;

  # "I.F" with exponent E (all decimal strings) as the nearest float, like
  # Python's float(): JSON numbers are parsed by strtod, correctly rounded.
  decimalToFloat =
    intPart: fracPart: exponent:
    let
      i = head (match "0*([0-9]*)" intPart);
      f = if fracPart == "" then "0" else fracPart;
      zerosInF = stringLength (head (match "(0*).*" f));
      allZero = match "0*" (i + f) != null;
      e =
        if stringLength exponent > 6 then
          (if substring 0 1 exponent == "-" then -1000000 else 1000000)
        else
          fromJSON exponent;
      # decimal exponent of the leading significant digit
      lead = if i != "" then stringLength i - 1 + e else e - zerosInF - 1;
    in
    if allZero then
      0.0
    else if lead > 300 then
      inf
    else if lead < -300 then
      0.0
    else
      fromJSON "${if i == "" then "0" else i}.${f}e${toString e}";

  ordinalChoices =
    choices:
    let
      quoted = map (c: "'${c}'") choices;
      n = length quoted;
    in
    if n == 1 then
      head quoted
    else
      concatStringsSep ", " (builtins.genList (k: elemAt quoted k) (n - 1))
      + " or "
      + elemAt quoted (n - 1);

  str = ctx: v: if isString v then v else fail ctx "Input should be a valid string";

  int =
    ctx: v:
    if isBool v then
      (if v then 1 else 0)
    else if isInt v then
      # fromTOML clamps integers beyond 64 bits to these; Python keeps them exactly.
      (if v == int64Max || v == int64Min then tooLarge ctx else v)
    else if isFloat v then
      (
        if !isFinite v then
          fail ctx "Input should be a finite number"
        else if v >= two63 || v < -two63 then
          fail ctx "Unable to parse input string as an integer, exceeded maximum size"
        else if floor v != v then
          fail ctx "Input should be a valid integer, got a number with a fractional part"
        else
          floor v
      )
    else if isString v then
      (
        let
          m = match "([+-]?)([0-9]+(_[0-9]+)*)(\\.0+)?" (strip v);
          value = digitsToInt (replaceStrings [ "_" ] [ "" ] (elemAt m 1));
        in
        if m == null then
          fail ctx "Input should be a valid integer, unable to parse string as an integer"
        else if value == null then
          tooLarge ctx
        else if head m == "-" then
          -value
        else
          value
      )
    else
      fail ctx "Input should be a valid integer";

  float =
    ctx: v:
    if isBool v then
      (if v then 1.0 else 0.0)
    else if isInt v then
      v * 1.0
    else if isFloat v then
      v
    else if isString v then
      (
        let
          s = strip v;
          # pydantic drops underscores unless one leads, trails or doubles
          plain = if match "_.*|.*_|.*__.*" s != null then "?" else replaceStrings [ "_" ] [ "" ] s;
          special = match "([+-]?)(inf|infinity|nan)" (toLower plain);
          m = match "([+-]?)([0-9]*)(\\.([0-9]*))?([eE]([+-]?[0-9]+))?" plain;
          signed = sign: x: if sign == "-" then -x else x;
          exponent = elemAt m 5;
        in
        if special != null then
          signed (head special) (if elemAt special 1 == "nan" then inf - inf else inf)
        else if m == null || (elemAt m 1 == "" && (elemAt m 3 == null || elemAt m 3 == "")) then
          fail ctx "Input should be a valid number, unable to parse string as a number"
        else
          signed (head m) (
            decimalToFloat (elemAt m 1) (if elemAt m 3 == null then "" else elemAt m 3) (
              if exponent == null then "0" else replaceStrings [ "+" ] [ "" ] exponent
            )
          )
      )
    else
      fail ctx "Input should be a valid number";

  bool =
    ctx: v:
    let
      parsing = fail ctx "Input should be a valid boolean, unable to interpret input";
    in
    if isBool v then
      v
    else if isInt v || isFloat v then
      (
        if v == 0 then
          false
        else if v == 1 then
          true
        else if isInt v then
          parsing
        else
          fail ctx "Input should be a valid boolean"
      )
    else if isString v then
      (
        let
          word = toLower v;
        in
        if elem word [ "1" "on" "t" "true" "y" "yes" ] then
          true
        else if elem word [ "0" "off" "f" "false" "n" "no" ] then
          false
        else
          parsing
      )
    else
      fail ctx "Input should be a valid boolean";

  literal =
    choices: ctx: v:
    if isString v && elem v choices then v else fail ctx "Input should be ${ordinalChoices choices}";

  # Field(le=, lt=, ge=, gt=): pydantic checks them in this order. Nix's `<=` is
  # `!(b < a)`, which NaN would pass: spelled out so NaN fails every bound.
  bounded =
    bounds: ctx: v:
    if bounds ? le && !(v < bounds.le || v == bounds.le) then
      fail ctx "Input should be less than or equal to ${toString bounds.le}"
    else if bounds ? lt && !(v < bounds.lt) then
      fail ctx "Input should be less than ${toString bounds.lt}"
    else if bounds ? ge && !(bounds.ge < v || v == bounds.ge) then
      fail ctx "Input should be greater than or equal to ${toString bounds.ge}"
    else if bounds ? gt && !(bounds.gt < v) then
      fail ctx "Input should be greater than ${toString bounds.gt}"
    else
      v;

  units = {
    "" = 1;
    k = 1024;
    m = 1048576;
    g = 1073741824;
    t = 1099511627776;
  };

  # corral.spec.units.parse_size: bytes as an int, or "64K", "512M", "1.5GiB"
  # (binary units, int(float(number) * unit)).
  size =
    ctx: v:
    let
      m = match "[[:space:]]*([0-9]+)(\\.([0-9]+))?[[:space:]]*([kmgtKMGT]?)([iI]?[bB])?[[:space:]]*" v;
      intPart = head (match "0*([0-9]+)" (head m));
      bytes = decimalToFloat intPart (if elemAt m 2 == null then "" else elemAt m 2) "0" * units.${toLower (elemAt m 3)};
    in
    if isBool v then
      fail ctx "a size must be a number of bytes or a string like '512M'"
    else if isInt v then
      (
        if v < 0 then
          fail ctx "a size cannot be negative"
        else if v == int64Max then
          tooLarge ctx
        else
          v
      )
    else if !isString v then
      # Python's parse_size raises TypeError here (it expects str or int).
      fail ctx "a size must be a number of bytes or a string like '512M'"
    else if m == null then
      fail ctx "'${v}' is not a size: use bytes or a number with K, M, G or T"
    else if stringLength intPart > 20 || bytes >= two63 then
      tooLarge ctx
    else
      floor bytes;

  # corral.spec.template._absolute_path: str(PurePosixPath(value)) of an absolute path.
  absolutePath =
    ctx: v:
    let
      parts = filter (p: isString p && p != "" && p != ".") (split "/" v);
      # Any run of leading slashes is one root (as the Python loader normalizes it).
      root = "/";
    in
    if substring 0 1 v != "/" then
      fail ctx "'${v}' must be an absolute path"
    else if elem ".." parts then
      fail ctx "'${v}' must not contain '..'"
    else
      root + concatStringsSep "/" parts;

  list =
    check: ctx: v:
    if !isList v then
      fail ctx "Input should be a valid tuple"
    else
      strictList (builtins.genList (i: check (ctx // { loc = ctx.loc ++ [ i ]; }) (elemAt v i)) (length v));

  # The list, after evaluating its items in order (so the first bad one is reported).
  strictList = items: builtins.seq (builtins.foldl' (acc: x: builtins.seq x acc) true items) items;
in
{
  inherit
    str
    int
    float
    bool
    literal
    bounded
    size
    absolutePath
    list
    strictList
    strip
    ;

  # Python's `re.match(r"^...$")` also accepts one trailing newline.
  matchesLine = regex: s: match regex s != null;
  fullMatch = regex: s: match regex s != null;
}
