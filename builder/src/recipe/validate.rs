//! Stage two of reading a recipe: the raw TOML model checked field by field into the
//! validated [`Recipe`], and the strict syntax of every string that reaches a tool.

use super::syntax::*;
use super::*;

pub(super) struct Validator<'a> {
    pub(super) path: &'a Path,
    pub(super) text: &'a str,
}

impl Validator<'_> {
    pub(super) fn err(
        &self,
        span: Range<usize>,
        field: &str,
        message: impl Into<String>,
    ) -> RecipeError {
        let (line, column) = line_col(self.text, span.start);
        RecipeError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub(super) fn check(
        &self,
        value: &Spanned<String>,
        field: &str,
        ok: impl Fn(&str) -> bool,
        why: &str,
    ) -> Result<String, RecipeError> {
        if ok(value.get_ref()) {
            Ok(value.get_ref().clone())
        } else {
            Err(self.err(
                value.span(),
                field,
                format!("{:?} is not valid: {why}", value.get_ref()),
            ))
        }
    }

    pub(super) fn recipe(
        &self,
        raw: RawRecipe,
        includes: Vec<PathBuf>,
    ) -> Result<Recipe, RecipeError> {
        // `include` was resolved before this model was read.
        let _ = raw.include;
        let image = self.image(raw.image)?;
        let mut base = self.base(raw.base)?;
        let kernel = self.kernel(raw.kernel)?;
        let (files, extra_digest) = self.files(raw.files)?;
        let systemd = self.systemd(raw.systemd)?;
        let disk = self.disk(raw.disk)?;
        let formats = self.formats(raw.output)?;
        let artifacts = self.artifacts(raw.artifacts, &files)?;
        let downloads = self.downloads(raw.downloads)?;
        let (update, update_digest) = self.update(raw.update)?;
        if update.is_some() {
            base.packages
                .extend(UPDATE_PACKAGES.iter().map(|p| p.to_string()));
            base.packages.sort();
            base.packages.dedup();
        }
        let mut hasher = Sha256::new();
        hasher.update(self.text.as_bytes());
        for d in extra_digest.into_iter().chain(update_digest) {
            hasher.update(d);
        }
        Ok(Recipe {
            path: self.path.to_path_buf(),
            digest: hex::encode(hasher.finalize()),
            image,
            base,
            kernel,
            files,
            systemd,
            disk,
            formats,
            artifacts,
            downloads,
            includes,
            update,
        })
    }

    pub(super) fn image(&self, raw: RawImage) -> Result<Image, RecipeError> {
        let name = self.check(
            &raw.name,
            "image.name",
            is_image_name,
            "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit (os-release IMAGE_ID)",
        )?;
        let version = self.check(
            &raw.version,
            "image.version",
            is_version,
            "use letters, digits and '.+~_-', starting with a letter or digit (os-release IMAGE_VERSION)",
        )?;
        let pretty_name = match &raw.pretty_name {
            Some(p) => self.check(
                p,
                "image.pretty_name",
                |s| {
                    !s.is_empty()
                        && s.len() <= 200
                        && !s.chars().any(|c| {
                            c.is_control() || c == '"' || c == '\\' || c == '$' || c == '`'
                        })
                },
                "must be 1-200 printable characters without quotes, backslashes, '$' or '`'",
            )?,
            None => format!("{name} {version}"),
        };
        let architecture = match &raw.architecture {
            None => Architecture::X86_64,
            Some(a) => match a.get_ref().as_str() {
                "x86_64" | "amd64" => Architecture::X86_64,
                other => {
                    return Err(self.err(
                        a.span(),
                        "image.architecture",
                        format!("{other:?} is not supported: only \"x86_64\" (Debian amd64) is"),
                    ))
                }
            },
        };
        let hostname = match &raw.hostname {
            Some(h) => self.check(
                h,
                "image.hostname",
                is_hostname,
                "use 1-63 letters, digits and '-', not starting or ending with '-'",
            )?,
            None => name.replace(['.', '_'], "-"),
        };
        let source_date_epoch = match &raw.source_date_epoch {
            Some(e) if *e.get_ref() < 0 => {
                return Err(self.err(
                    e.span(),
                    "image.source_date_epoch",
                    "must be a non-negative number of seconds since 1970",
                ))
            }
            Some(e) => Some(*e.get_ref()),
            None => None,
        };
        Ok(Image {
            name,
            version,
            pretty_name,
            architecture,
            hostname,
            source_date_epoch,
        })
    }

    pub(super) fn base(&self, raw: RawBase) -> Result<Base, RecipeError> {
        let suite = match &raw.suite {
            Some(s) => self.check(
                s,
                "base.suite",
                is_suite,
                "use lower-case letters, digits and '-' (a Debian suite or codename)",
            )?,
            None => "bookworm".to_string(),
        };
        let mut mirrors = Vec::new();
        if let Some(list) = &raw.mirrors {
            if list.get_ref().is_empty() {
                return Err(self.err(
                    list.span(),
                    "base.mirrors",
                    "is empty: leave it out to use the host's apt sources",
                ));
            }
            for (i, m) in list.get_ref().iter().enumerate() {
                mirrors.push(self.check(
                    m,
                    &format!("base.mirrors[{i}]"),
                    is_mirror,
                    "expected an http(s)/file URL or a one-line sources entry \"deb URL SUITE COMPONENT...\"",
                )?);
            }
        }
        let components = match &raw.components {
            None => vec!["main".to_string()],
            Some(list) => {
                let mut out = Vec::new();
                for (i, c) in list.iter().enumerate() {
                    out.push(self.check(
                        c,
                        &format!("base.components[{i}]"),
                        is_suite,
                        "use lower-case letters, digits and '-'",
                    )?);
                }
                out
            }
        };
        let mut packages: Vec<String> = REQUIRED_PACKAGES.iter().map(|s| s.to_string()).collect();
        for (i, p) in raw.packages.iter().enumerate() {
            packages.push(self.check(
                p,
                &format!("base.packages[{i}]"),
                is_package,
                "not a Debian package name (lower-case letters, digits, '+', '-', '.'; 2+ characters)",
            )?);
        }
        packages.sort();
        packages.dedup();
        Ok(Base {
            suite,
            mirrors,
            components,
            packages,
            docs: raw.docs.unwrap_or(false),
            recommends: raw.recommends.unwrap_or(false),
        })
    }

    pub(super) fn kernel(&self, raw: RawKernel) -> Result<Kernel, RecipeError> {
        let cmdline = match &raw.cmdline {
            Some(c) => {
                let s = self.check(
                    c,
                    "kernel.cmdline",
                    |s| s.len() <= 2048 && !s.chars().any(|ch| ch.is_control()),
                    "must be one line of at most 2048 printable characters",
                )?;
                if let Some(bad) = s
                    .split_whitespace()
                    .find(|w| w.starts_with("root=") || *w == "ro" || *w == "rw")
                {
                    return Err(self.err(
                        c.span(),
                        "kernel.cmdline",
                        format!("{bad:?} is set by imgbuild for each slot; remove it"),
                    ));
                }
                s
            }
            None => DEFAULT_CMDLINE.to_string(),
        };
        let initrd = match &raw.initrd {
            None => InitrdMode::Small,
            Some(m) => match m.get_ref().as_str() {
                "small" => InitrdMode::Small,
                "full" => InitrdMode::Full,
                other => {
                    return Err(self.err(
                        m.span(),
                        "kernel.initrd",
                        format!("{other:?} is not one of \"small\" (listed modules only) or \"full\" (Debian's MODULES=most)"),
                    ))
                }
            },
        };
        let mut initrd_modules: Vec<String> = DEFAULT_INITRD_MODULES
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (i, m) in raw.initrd_modules.iter().enumerate() {
            initrd_modules.push(self.check(
                m,
                &format!("kernel.initrd_modules[{i}]"),
                |s| {
                    !s.is_empty()
                        && s.len() <= 64
                        && s.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                },
                "a kernel module name: letters, digits, '_' and '-'",
            )?);
        }
        initrd_modules.dedup();
        Ok(Kernel {
            cmdline,
            initrd,
            initrd_modules,
        })
    }

    pub(super) fn files(
        &self,
        raw: Vec<RawFile>,
    ) -> Result<(Vec<FileEntry>, Vec<[u8; 32]>), RecipeError> {
        let base_dir = self.path.parent().unwrap_or(Path::new("."));
        let mut out: Vec<FileEntry> = Vec::new();
        let mut digests = Vec::new();
        for (i, f) in raw.into_iter().enumerate() {
            let field = format!("files[{i}]");
            let path = self.check(
                &f.path,
                &format!("{field}.path"),
                is_image_path,
                "must be an absolute, normalised path (no '.', '..', '//' or control characters) below /",
            )?;
            if out.iter().any(|o| o.path == path) {
                return Err(self.err(
                    f.path.span(),
                    &format!("{field}.path"),
                    format!("{path:?} is listed twice"),
                ));
            }
            let content = match (f.content, f.source) {
                (Some(c), None) => {
                    digests.push(Sha256::digest(c.as_bytes()).into());
                    FileContent::Inline(c)
                }
                (None, Some(src)) => {
                    let rel = src.get_ref();
                    let full = base_dir.join(rel);
                    let bytes = fs::read(&full).map_err(|e| {
                        self.err(
                            src.span(),
                            &format!("{field}.source"),
                            format!("cannot read {}: {e}", full.display()),
                        )
                    })?;
                    digests.push(Sha256::digest(&bytes).into());
                    FileContent::Source(full)
                }
                (Some(_), Some(src)) => {
                    return Err(self.err(
                        src.span(),
                        &field,
                        "give either content or source, not both",
                    ))
                }
                (None, None) => {
                    return Err(self.err(f.path.span(), &field, "needs content or source"))
                }
            };
            let mode = match &f.mode {
                None => 0o644,
                Some(m) => {
                    let s = m.get_ref();
                    match u32::from_str_radix(s, 8) {
                        Ok(v) if v <= 0o7777 && !s.is_empty() => v,
                        _ => {
                            return Err(self.err(
                                m.span(),
                                &format!("{field}.mode"),
                                format!("{s:?} is not an octal file mode like \"0644\""),
                            ))
                        }
                    }
                }
            };
            out.push(FileEntry {
                path,
                content,
                mode,
            });
        }
        Ok((out, digests))
    }

    pub(super) fn units(
        &self,
        list: &[Spanned<String>],
        key: &str,
    ) -> Result<Vec<String>, RecipeError> {
        list.iter()
            .enumerate()
            .map(|(i, u)| {
                self.check(
                    u,
                    &format!("systemd.{key}[{i}]"),
                    is_unit_name,
                    "not a systemd unit name like \"foo.service\" or \"bar.timer\"",
                )
            })
            .collect()
    }

    pub(super) fn systemd(&self, raw: RawSystemd) -> Result<Systemd, RecipeError> {
        Ok(Systemd {
            enable: self.units(&raw.enable, "enable")?,
            disable: self.units(&raw.disable, "disable")?,
            mask: self.units(&raw.mask, "mask")?,
            boot_report: raw.boot_report.unwrap_or(true),
        })
    }

    pub(super) fn size(
        &self,
        raw: &Option<Spanned<String>>,
        field: &str,
        default: u64,
        min: u64,
    ) -> Result<u64, RecipeError> {
        let Some(s) = raw else { return Ok(default) };
        let bytes = parse_size(s.get_ref()).map_err(|why| self.err(s.span(), field, why))?;
        if bytes < min {
            return Err(self.err(
                s.span(),
                field,
                format!("{} is too small: at least {} MiB", s.get_ref(), min / MIB),
            ));
        }
        if bytes % MIB != 0 {
            return Err(self.err(
                s.span(),
                field,
                format!(
                    "{} is not a whole number of MiB (partitions are 1 MiB aligned)",
                    s.get_ref()
                ),
            ));
        }
        Ok(bytes)
    }

    pub(super) fn disk(&self, raw: RawDisk) -> Result<DiskConfig, RecipeError> {
        Ok(DiskConfig {
            // FAT32 with 512-byte sectors needs at least 65525 clusters.
            esp_size: self.size(&raw.esp_size, "disk.esp_size", DEFAULT_ESP_SIZE, 64 * MIB)?,
            root_size: self.size(
                &raw.root_size,
                "disk.root_size",
                DEFAULT_ROOT_SIZE,
                64 * MIB,
            )?,
            var_size: self.size(&raw.var_size, "disk.var_size", DEFAULT_VAR_SIZE, 16 * MIB)?,
        })
    }

    pub(super) fn mode(
        &self,
        raw: &Option<Spanned<String>>,
        field: &str,
        default: u32,
    ) -> Result<u32, RecipeError> {
        let Some(m) = raw else { return Ok(default) };
        let s = m.get_ref();
        match u32::from_str_radix(s, 8) {
            Ok(v) if v <= 0o7777 && !s.is_empty() => Ok(v),
            _ => Err(self.err(
                m.span(),
                field,
                format!("{s:?} is not an octal file mode like \"0755\""),
            )),
        }
    }

    pub(super) fn artifacts(
        &self,
        raw: Vec<RawArtifact>,
        files: &[FileEntry],
    ) -> Result<Vec<PinnedArtifact>, RecipeError> {
        let mut out: Vec<PinnedArtifact> = Vec::new();
        for (i, a) in raw.into_iter().enumerate() {
            let field = format!("artifacts[{i}]");
            let name = self.check(
                &a.name,
                &format!("{field}.name"),
                is_image_name,
                "use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit",
            )?;
            if out.iter().any(|o| o.name == name) {
                return Err(self.err(
                    a.name.span(),
                    &format!("{field}.name"),
                    format!("{name:?} is listed twice"),
                ));
            }
            let url = self.check(
                &a.url,
                &format!("{field}.url"),
                |u| is_url(u) && url_file_name(u).is_some(),
                "expected an http(s):// or file:/ URL ending in a file name",
            )?;
            let sha256 = self.check(
                &a.sha256,
                &format!("{field}.sha256"),
                |h| {
                    h.len() == 64
                        && h.bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                },
                "expected 64 lower-case hex digits",
            )?;
            let install = match (&a.extract, &a.dest, &a.members) {
                (None, Some(dest), None) => ArtifactInstall::File {
                    dest: self.check(
                        dest,
                        &format!("{field}.dest"),
                        is_image_path,
                        "must be an absolute, normalised path below /",
                    )?,
                },
                (None, None, _) => {
                    return Err(self.err(
                        a.name.span(),
                        &format!("{field}.dest"),
                        "is required (the path in the image), or use extract + members",
                    ))
                }
                (None, Some(_), Some(m)) => {
                    return Err(self.err(
                        m.span(),
                        &format!("{field}.members"),
                        "only with extract = \"tar.gz\"",
                    ))
                }
                (Some(x), dest, members) => {
                    if x.get_ref() != "tar.gz" {
                        return Err(self.err(
                            x.span(),
                            &format!("{field}.extract"),
                            format!("{:?} is not supported: only \"tar.gz\"", x.get_ref()),
                        ));
                    }
                    if let Some(d) = dest {
                        return Err(self.err(
                            d.span(),
                            &format!("{field}.dest"),
                            "an extracted archive installs `members`, not `dest`",
                        ));
                    }
                    let Some(members) = members else {
                        return Err(self.err(
                            x.span(),
                            &format!("{field}.members"),
                            "is required with extract: { \"path/in/archive\" = \"/path/in/image\" }",
                        ));
                    };
                    if members.get_ref().is_empty() {
                        return Err(self.err(
                            members.span(),
                            &format!("{field}.members"),
                            "is empty",
                        ));
                    }
                    for (member, dest) in members.get_ref() {
                        if !is_archive_member(member) {
                            return Err(self.err(
                                members.span(),
                                &format!("{field}.members"),
                                format!(
                                    "{member:?} is not a relative, normalised path in the archive"
                                ),
                            ));
                        }
                        if !is_image_path(dest) {
                            return Err(self.err(
                                members.span(),
                                &format!("{field}.members.{member}"),
                                format!("{dest:?} is not an absolute, normalised path below /"),
                            ));
                        }
                    }
                    ArtifactInstall::TarGz {
                        members: members.get_ref().clone(),
                    }
                }
            };
            for dest in install.dests() {
                let clash = files.iter().any(|f| f.path == dest)
                    || out.iter().any(|o| o.install.dests().contains(&dest));
                if clash {
                    return Err(self.err(
                        a.name.span(),
                        &field,
                        format!("{dest:?} is also written by another file or artifact"),
                    ));
                }
            }
            let mode = self.mode(&a.mode, &format!("{field}.mode"), 0o755)?;
            out.push(PinnedArtifact {
                name,
                url,
                sha256,
                install,
                mode,
            });
        }
        Ok(out)
    }

    pub(super) fn downloads(&self, raw: RawDownloads) -> Result<Downloads, RecipeError> {
        let mirror = match &raw.mirror {
            None => None,
            Some(m) => {
                let s = self.check(
                    m,
                    "downloads.mirror",
                    |s| !s.is_empty() && s.len() <= 1024 && !s.chars().any(|c| c.is_control()),
                    "must be a directory path",
                )?;
                Some(self.path.parent().unwrap_or(Path::new(".")).join(s))
            }
        };
        Ok(Downloads { mirror })
    }

    pub(super) fn formats(&self, raw: RawOutput) -> Result<Vec<Format>, RecipeError> {
        let Some(list) = raw.formats else {
            return Ok(vec![Format::Raw, Format::Qcow2]);
        };
        let mut out = Vec::new();
        for (i, f) in list.iter().enumerate() {
            let fmt = match f.get_ref().as_str() {
                "raw" => Format::Raw,
                "qcow2" => Format::Qcow2,
                "iso" => Format::Iso,
                "pxe" => Format::Pxe,
                other => {
                    return Err(self.err(
                        f.span(),
                        &format!("output.formats[{i}]"),
                        format!("{other:?} is not a known format: expected \"raw\", \"qcow2\", \"iso\" or \"pxe\""),
                    ))
                }
            };
            out.push(fmt);
        }
        out.sort();
        out.dedup();
        // (The raw disk is always made, every disk output comes from it; `raw` here only
        // says whether it is kept.)
        Ok(out)
    }
}
