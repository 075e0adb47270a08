//! The Terraform code in `terraform/` (one region module, instantiated per region by the root module, with
//! latency-routed DNS in front). Providers cannot be downloaded everywhere the tests run, so `terraform
//! validate` is not run here; instead:
//!
//! 1. `terraform fmt -check -recursive terraform/` (terraform must be on PATH, as it is on the machine image; the
//!    test fails, saying so, without it);
//! 2. checkov (installed by `scripts/test.sh` into `$FERRY_TOOLS_DIR/checkov`, by default
//!    `target/tools/checkov`) over `terraform/` with `terraform/.checkov.yaml`, offline, with zero failed checks
//!    (deliberate exceptions are inline `#checkov:skip=ID:reason` comments, each listed in the README);
//! 3. a structural check: every `variable` block in `terraform/**/*.tf` has a `description` and a `type`, every
//!    `number` variable has a `validation` block, and every variable is documented in `terraform/README.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::support::repo;

fn terraform_dir() -> PathBuf {
    repo().join("terraform")
}

/// Every `*.tf` file under `dir`, recursively, skipping `.terraform/` (provider and module caches).
fn tf_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read dir {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == ".terraform") {
                continue;
            }
            tf_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "tf") {
            out.push(path);
        }
    }
    out.sort();
    Ok(())
}

fn command_output(cmd: &mut Command) -> Result<(bool, String)> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    let text = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn terraform_fmt_is_clean() -> Result<()> {
    let mut cmd = Command::new("terraform");
    cmd.args(["fmt", "-check", "-recursive", "-diff", "terraform/"])
        .current_dir(repo());
    // A missing terraform fails the test (a check that cannot run must not pass): the machine image has it.
    let (ok, text) = command_output(&mut cmd).map_err(|e| {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
        {
            e.context("terraform is not on PATH: `terraform fmt -check` cannot run")
        } else {
            e
        }
    })?;
    ensure!(
        ok,
        "`terraform fmt -check -recursive terraform/` found unformatted files (run `terraform fmt -recursive terraform/`):\n{text}"
    );
    Ok(())
}

/// The checkov executable: `$FERRY_TOOLS_DIR/checkov/bin/checkov`, else `target/tools/checkov/bin/checkov`.
fn checkov() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("FERRY_TOOLS_DIR").filter(|d| !d.is_empty()) {
        candidates.push(PathBuf::from(dir).join("checkov/bin/checkov"));
    }
    candidates.push(repo().join("target/tools/checkov/bin/checkov"));
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => bail!(
            "checkov not found at {candidates:?}: run scripts/test.sh, which installs it, or \
             `python3 -m venv target/tools/checkov && target/tools/checkov/bin/pip install checkov==3.3.30`"
        ),
    }
}

/// `Failed checks: N` from checkov's summary (one per framework; summed).
fn checkov_counts(output: &str, label: &str) -> Option<u64> {
    let mut found = None;
    for line in output.lines() {
        for part in line.split(',') {
            if let Some(n) = part.trim().strip_prefix(label) {
                let n: u64 = n.trim().parse().ok()?;
                found = Some(found.unwrap_or(0) + n);
            }
        }
    }
    found
}

#[test]
fn checkov_finds_no_failed_checks() -> Result<()> {
    let checkov = checkov()?;
    let mut cmd = Command::new(&checkov);
    cmd.args([
        "-d",
        "terraform",
        "--config-file",
        "terraform/.checkov.yaml",
        "--framework",
        "terraform",
        "--quiet",
        "--compact",
        "--skip-download",
        "--download-external-modules",
        "false",
    ])
    .current_dir(repo())
    // Offline: no version check against the package index, no mapping or guideline downloads.
    .env("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
    .env("BC_SKIP_MAPPING", "TRUE")
    .env_remove("BC_API_KEY");
    let (ok, text) = command_output(&mut cmd)?;
    let failed = checkov_counts(&text, "Failed checks:").with_context(|| {
        format!(
            "no `Failed checks:` summary from {}:\n{text}",
            checkov.display()
        )
    })?;
    let passed = checkov_counts(&text, "Passed checks:").unwrap_or(0);
    ensure!(
        failed == 0 && ok,
        "checkov found {failed} failed check(s) in terraform/ (fix them, or skip one inline with \
         `#checkov:skip=ID:reason` and list it in terraform/README.md):\n{text}"
    );
    // A scan that parsed nothing would pass vacuously.
    ensure!(
        passed >= 100,
        "checkov passed only {passed} checks: did it parse terraform/?\n{text}"
    );
    Ok(())
}

/// The source with string contents, comments and heredocs blanked out (newlines kept, one output char per
/// input char), so braces and identifiers in it are structure. String delimiters at the top level stay.
fn skeleton(src: &str) -> Vec<char> {
    enum Ctx {
        Str,
        Interp(usize),
    }
    fn blank(c: char) -> char {
        if c == '\n' { '\n' } else { ' ' }
    }
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::with_capacity(chars.len());
    let mut stack: Vec<Ctx> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match stack.last_mut() {
            Some(Ctx::Str) => {
                if c == '\\' {
                    out.push(' ');
                    if let Some(n) = next {
                        out.push(blank(n));
                    }
                    i += 2;
                    continue;
                }
                if c == '"' {
                    stack.pop();
                    out.push(if stack.is_empty() { '"' } else { ' ' });
                } else if c == '$' && next == Some('{') {
                    stack.push(Ctx::Interp(0));
                    out.extend([' ', ' ']);
                    i += 2;
                    continue;
                } else {
                    out.push(blank(c));
                }
            }
            Some(Ctx::Interp(depth)) => {
                match c {
                    '{' => *depth += 1,
                    '}' if *depth == 0 => {
                        stack.pop();
                    }
                    '}' => *depth -= 1,
                    '"' => stack.push(Ctx::Str),
                    _ => {}
                }
                out.push(blank(c));
            }
            None => {
                if c == '#' || (c == '/' && next == Some('/')) {
                    while i < chars.len() && chars[i] != '\n' {
                        out.push(' ');
                        i += 1;
                    }
                    continue;
                }
                if c == '/' && next == Some('*') {
                    while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                        out.push(blank(chars[i]));
                        i += 1;
                    }
                    out.extend([' ', ' ']);
                    i += 2;
                    continue;
                }
                if c == '<' && next == Some('<') {
                    // Heredoc: <<EOT or <<-EOT, up to a line that is the marker alone.
                    let mut j = i + 2;
                    if chars.get(j) == Some(&'-') {
                        j += 1;
                    }
                    let start = j;
                    while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                        j += 1;
                    }
                    let marker: String = chars[start..j].iter().collect();
                    if !marker.is_empty() {
                        let mut k = j;
                        loop {
                            while k < chars.len() && chars[k] != '\n' {
                                k += 1;
                            }
                            if k >= chars.len() {
                                break;
                            }
                            k += 1;
                            let mut end = k;
                            while end < chars.len() && chars[end] != '\n' {
                                end += 1;
                            }
                            let line: String = chars[k..end].iter().collect();
                            if line.trim() == marker {
                                k = end;
                                break;
                            }
                        }
                        out.extend(chars[i..k.min(chars.len())].iter().map(|&c| blank(c)));
                        i = k;
                        continue;
                    }
                }
                if c == '"' {
                    stack.push(Ctx::Str);
                }
                out.push(c);
            }
        }
        i += 1;
    }
    out
}

/// One `variable "name" { ... }` block: its name and the attribute and nested block names directly inside it
/// (`description`, `type`, `default`, `validation`, ...), in order.
#[derive(Debug)]
struct Variable {
    name: String,
    keys: Vec<String>,
    /// The `type = ...` expression, as written on its line.
    type_expr: Option<String>,
}

/// The top-level `variable` blocks of one `.tf` file.
fn variables(src: &str) -> Result<Vec<Variable>> {
    let chars: Vec<char> = src.chars().collect();
    let skel = skeleton(src);
    let mut vars = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    let is_ident = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    while i < skel.len() {
        match skel[i] {
            '{' => depth += 1,
            '}' => depth = depth.checked_sub(1).context("unbalanced `}`")?,
            _ => {}
        }
        let word_start = depth == 0 && (i == 0 || !is_ident(skel[i - 1]));
        let kw: String = skel[i..(i + 8).min(skel.len())].iter().collect();
        if !(word_start && kw == "variable" && skel.get(i + 8).is_some_and(|c| c.is_whitespace())) {
            i += 1;
            continue;
        }
        // variable "name" {
        let mut j = i + 8;
        while skel.get(j).is_some_and(|c| c.is_whitespace()) {
            j += 1;
        }
        ensure!(
            skel.get(j) == Some(&'"'),
            "`variable` without a quoted name"
        );
        let name_start = j + 1;
        j = name_start;
        while skel.get(j).is_some_and(|&c| c != '"') {
            j += 1;
        }
        let name: String = chars[name_start..j].iter().collect();
        j += 1;
        while skel.get(j).is_some_and(|c| c.is_whitespace()) {
            j += 1;
        }
        ensure!(
            skel.get(j) == Some(&'{'),
            "variable {name}: no `{{` after the name"
        );
        // The body, up to the matching brace; keys are identifiers at the start of a line at depth 1.
        let mut d = 1usize;
        let mut k = j + 1;
        let mut keys = Vec::new();
        let mut type_expr = None;
        let mut line_start = true;
        while k < skel.len() && d > 0 {
            let c = skel[k];
            if line_start && d == 1 && is_ident(c) {
                let s = k;
                while skel.get(k).is_some_and(|&c| is_ident(c)) {
                    k += 1;
                }
                let mut m = k;
                while skel.get(m).is_some_and(|&c| c == ' ' || c == '\t') {
                    m += 1;
                }
                if matches!(skel.get(m), Some('=') | Some('{')) {
                    let key: String = chars[s..k].iter().collect();
                    if key == "type" && skel[m] == '=' {
                        let end = (m..chars.len())
                            .find(|&e| chars[e] == '\n')
                            .unwrap_or(chars.len());
                        type_expr = Some(
                            chars[m + 1..end]
                                .iter()
                                .collect::<String>()
                                .trim()
                                .to_string(),
                        );
                    }
                    keys.push(key);
                }
                line_start = false;
                continue;
            }
            match c {
                '{' => d += 1,
                '}' => d -= 1,
                '\n' => line_start = true,
                ' ' | '\t' => {}
                _ => line_start = false,
            }
            k += 1;
        }
        ensure!(d == 0, "variable {name}: no closing `}}`");
        vars.push(Variable {
            name,
            keys,
            type_expr,
        });
        i = k;
    }
    ensure!(depth == 0, "unbalanced braces");
    Ok(vars)
}

/// What is wrong with the variables of one file: missing description or type, a number without validation,
/// or (with `readme`) a variable the README does not name in backticks.
fn variable_problems(file: &str, src: &str, readme: Option<&str>) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for v in variables(src).with_context(|| format!("parse {file}"))? {
        for required in ["description", "type"] {
            if !v.keys.iter().any(|k| k == required) {
                problems.push(format!("{file}: variable `{}` has no {required}", v.name));
            }
        }
        let is_number = v.type_expr.as_deref() == Some("number");
        if is_number && !v.keys.iter().any(|k| k == "validation") {
            problems.push(format!(
                "{file}: number variable `{}` has no validation block",
                v.name
            ));
        }
        if let Some(readme) = readme
            && !readme.contains(&format!("`{}`", v.name))
        {
            problems.push(format!(
                "{file}: variable `{}` is not documented in terraform/README.md",
                v.name
            ));
        }
    }
    Ok(problems)
}

#[test]
fn every_variable_is_described_typed_and_documented() -> Result<()> {
    let dir = terraform_dir();
    let readme =
        std::fs::read_to_string(dir.join("README.md")).context("read terraform/README.md")?;
    let mut files = Vec::new();
    tf_files(&dir, &mut files)?;
    ensure!(!files.is_empty(), "no .tf files under {}", dir.display());

    let mut problems = Vec::new();
    let mut per_module: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in &files {
        let rel = file
            .strip_prefix(&dir)
            .unwrap_or(file)
            .display()
            .to_string();
        let src = std::fs::read_to_string(file).with_context(|| format!("read {rel}"))?;
        problems.extend(variable_problems(&rel, &src, Some(&readme))?);
        let module = Path::new(&rel)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let module = if module.is_empty() {
            "(root)".to_string()
        } else {
            module
        };
        per_module
            .entry(module)
            .or_default()
            .extend(variables(&src)?.into_iter().map(|v| v.name));
    }
    ensure!(
        problems.is_empty(),
        "terraform variables:\n  {}",
        problems.join("\n  ")
    );

    // The scan must have seen the modules it is about, or it passes vacuously.
    let root = per_module.get("(root)").cloned().unwrap_or_default();
    let region = per_module
        .get("modules/region")
        .cloned()
        .unwrap_or_default();
    for (module, vars, expected) in [
        (
            "root",
            &root,
            ["regions", "dns_zone_name", "cluster_public_access_cidrs"],
        ),
        (
            "modules/region",
            &region,
            ["region", "jwt_secret", "vpc_cidr"],
        ),
    ] {
        for name in expected {
            ensure!(
                vars.iter().any(|v| v == name),
                "{module}: variable `{name}` not found (found {vars:?})"
            );
        }
    }
    ensure!(region.len() >= 20, "modules/region: only {region:?}");
    Ok(())
}

/// Every inline `#checkov:skip=ID:reason` gives a reason and is listed in the README's table of skips.
#[test]
fn every_checkov_skip_has_a_reason_and_is_documented() -> Result<()> {
    let dir = terraform_dir();
    let readme =
        std::fs::read_to_string(dir.join("README.md")).context("read terraform/README.md")?;
    let mut files = Vec::new();
    tf_files(&dir, &mut files)?;
    let mut problems = Vec::new();
    let mut skips = 0;
    for file in &files {
        let rel = file
            .strip_prefix(&dir)
            .unwrap_or(file)
            .display()
            .to_string();
        let src = std::fs::read_to_string(file).with_context(|| format!("read {rel}"))?;
        for (n, line) in src.lines().enumerate() {
            let Some((_, rest)) = line.split_once("checkov:skip=") else {
                continue;
            };
            skips += 1;
            let (id, reason) = rest.split_once(':').unwrap_or((rest, ""));
            let id = id.trim();
            if reason.trim().len() < 20 {
                problems.push(format!(
                    "{rel}:{}: skip of {id} without a real reason",
                    n + 1
                ));
            }
            if !readme.contains(&format!("`{id}`")) {
                problems.push(format!(
                    "{rel}:{}: skip of {id} is not listed in terraform/README.md",
                    n + 1
                ));
            }
        }
    }
    ensure!(
        problems.is_empty(),
        "checkov skips:\n  {}",
        problems.join("\n  ")
    );
    ensure!(
        skips > 0,
        "no inline checkov skips found: was terraform/ scanned?"
    );
    Ok(())
}

/// The structural check itself catches what it is for (so the test above can fail).
#[test]
fn structural_check_catches_bad_variables() -> Result<()> {
    let src = r#"
# variable "commented" {}
variable "good" {
  description = "Has { braces } and \"quotes\" and ${var.x} in it"
  type        = number
  default     = 3

  validation {
    condition     = var.good > 0 && can(regex("^[a-z]{2}$", "${var.y}"))
    error_message = "must be } positive"
  }
}

variable "no_description" {
  type = string
  default = <<-EOT
    description = "inside a heredoc, not an attribute"
    }
  EOT
}

variable "no_type" {
  description = "nested { object } defaults do not count"
  default = {
    type = "x"
  }
}

variable "number_without_validation" {
  description = "a size"
  type        = number
}

locals {
  description = "not a variable"
}
"#;
    let vars = variables(src)?;
    let names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "good",
            "no_description",
            "no_type",
            "number_without_validation"
        ]
    );
    assert_eq!(
        vars[0].keys,
        ["description", "type", "default", "validation"]
    );
    assert_eq!(vars[0].type_expr.as_deref(), Some("number"));
    assert_eq!(vars[1].type_expr.as_deref(), Some("string"));
    assert_eq!(vars[2].type_expr, None);

    let readme = "`good`, `no_type`, `no_description`";
    let problems = variable_problems("t.tf", src, Some(readme))?;
    assert_eq!(
        problems,
        [
            "t.tf: variable `no_description` has no description",
            "t.tf: variable `no_type` has no type",
            "t.tf: number variable `number_without_validation` has no validation block",
            "t.tf: variable `number_without_validation` is not documented in terraform/README.md",
        ]
    );
    Ok(())
}

#[test]
fn checkov_summary_is_parsed() {
    let out =
        "terraform scan results:\n\nPassed checks: 337, Failed checks: 2, Skipped checks: 16\n";
    assert_eq!(checkov_counts(out, "Failed checks:"), Some(2));
    assert_eq!(checkov_counts(out, "Passed checks:"), Some(337));
    assert_eq!(checkov_counts("nothing", "Failed checks:"), None);
}
