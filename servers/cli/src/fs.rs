//! `r3fs fs`: namespace operations through a meta server, for operators and
//! scripts. Acts as the calling user (effective uid, gid and groups) unless
//! `--uid`/`--gid` say otherwise. Only metadata: file contents need the data
//! path (storage and the FUSE client).

use std::net::SocketAddr;

use anyhow::{bail, Context};
use clap::Subcommand;
use r3fs_client::{MetaClient, MetaClientConfig};
use r3fs_wire::meta::{
    Attr, CreateRequest, FileType, OpenFlags, RenameFlags, RenameRequest, SetAttrRequest, SetTime,
    SetXattrRequest, User, XattrFlags,
};

#[derive(clap::Args)]
pub struct FsArgs {
    /// Meta server address; repeat for several servers.
    #[arg(
        long = "meta",
        env = "R3FS_META",
        value_delimiter = ',',
        default_value = "127.0.0.1:9100"
    )]
    servers: Vec<SocketAddr>,
    /// Act as this uid [default: the caller's effective uid].
    #[arg(long)]
    uid: Option<u32>,
    /// Act as this gid [default: the caller's effective gid].
    #[arg(long)]
    gid: Option<u32>,
    #[command(subcommand)]
    op: FsOp,
}

#[derive(Subcommand)]
enum FsOp {
    /// List a directory.
    Ls {
        path: String,
        /// Long format: type, mode, links, owner, size, inode.
        #[arg(short)]
        long: bool,
    },
    /// Show a path's attributes.
    Stat { path: String },
    /// Make a directory.
    Mkdir {
        path: String,
        /// Make missing parents too; no error if it exists.
        #[arg(short)]
        parents: bool,
        #[arg(long, default_value = "755", value_parser = parse_mode)]
        mode: u32,
    },
    /// Create an empty file, or set an existing file's times to now.
    Touch {
        path: String,
        #[arg(long, default_value = "644", value_parser = parse_mode)]
        mode: u32,
    },
    /// Remove a file, symlink or other non-directory.
    Rm { path: String },
    /// Remove an empty directory.
    Rmdir { path: String },
    /// Rename or move.
    Mv {
        from: String,
        to: String,
        /// Fail if the target exists.
        #[arg(long)]
        noreplace: bool,
        /// Swap the two names atomically.
        #[arg(long, conflicts_with = "noreplace")]
        exchange: bool,
    },
    /// Make a hard link, or a symbolic link with -s.
    Ln {
        target: String,
        path: String,
        #[arg(short)]
        symbolic: bool,
    },
    /// Print a symlink's target.
    Readlink { path: String },
    /// Change permission bits (octal).
    Chmod {
        #[arg(value_parser = parse_mode)]
        mode: u32,
        path: String,
    },
    /// Change owner and/or group: UID, UID:GID or :GID.
    Chown { owner: String, path: String },
    /// Set an extended attribute.
    Setfattr {
        path: String,
        name: String,
        value: String,
    },
    /// Print an extended attribute, or all names when NAME is left out.
    Getfattr { path: String, name: Option<String> },
    /// Show capacity and usage.
    Statfs,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode between 0 and 7777")),
    }
}

pub fn run(args: FsArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(run_op(args))
}

fn caller(args: &FsArgs) -> User {
    let groups = nix::unistd::getgroups()
        .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default();
    User {
        uid: args.uid.unwrap_or_else(|| nix::unistd::geteuid().as_raw()),
        gid: args.gid.unwrap_or_else(|| nix::unistd::getegid().as_raw()),
        groups,
    }
}

async fn run_op(args: FsArgs) -> anyhow::Result<()> {
    let user = caller(&args);
    let meta = MetaClient::new(MetaClientConfig::new(args.servers.clone()))?;
    let m = &meta;
    let u = &user;
    match args.op {
        FsOp::Ls { path, long } => {
            let dir = m.resolve(u, &path, true).await?;
            if dir.file_type != FileType::Directory {
                print_entry(&path, &dir, long);
                return Ok(());
            }
            for e in m.readdir_all(u, dir.inode, long).await? {
                let name = String::from_utf8_lossy(&e.name);
                match e.attr {
                    Some(attr) => print_entry(&name, &attr, true),
                    None => println!("{name}"),
                }
            }
        }
        FsOp::Stat { path } => {
            let a = m.resolve(u, &path, false).await?;
            println!("  path: {path}\n inode: {}\n  type: {:?}\n  mode: {:o}\n links: {}\n owner: {}:{}\n  size: {}", a.inode, a.file_type, a.perm, a.nlink, a.uid, a.gid, a.size);
            println!(
                " atime: {}.{:09}\n mtime: {}.{:09}\n ctime: {}.{:09}",
                a.atime.sec, a.atime.nsec, a.mtime.sec, a.mtime.nsec, a.ctime.sec, a.ctime.nsec
            );
            if let Some(l) = &a.layout {
                println!(
                    "layout: chunk {} bytes, stripe {} over chains {:?}",
                    l.chunk_size, l.stripe, l.chains
                );
            }
        }
        FsOp::Mkdir {
            path,
            parents,
            mode,
        } => {
            if !parents {
                let (parent, name) = m.resolve_parent(u, &path).await?;
                m.mkdir(u, parent.inode, &name, mode).await?;
                return Ok(());
            }
            let mut at = m.resolve(u, "/", true).await?;
            for part in path.split('/').filter(|p| !p.is_empty()) {
                at = match m.mkdir(u, at.inode, part.as_bytes(), mode).await {
                    Ok(a) => a,
                    Err(e) if e.errno() == libc::EEXIST => {
                        m.lookup(u, at.inode, part.as_bytes()).await?
                    }
                    Err(e) => return Err(e.into()),
                };
            }
        }
        FsOp::Touch { path, mode } => {
            let (parent, name) = m.resolve_parent(u, &path).await?;
            let req = CreateRequest {
                user: u.clone(),
                parent: parent.inode,
                name,
                perm: mode,
                exclusive: false,
                flags: OpenFlags::default(),
                client: 0,
            };
            let made = m.create(req).await?;
            if !made.created {
                let times = SetAttrRequest {
                    user: u.clone(),
                    inode: made.attr.inode,
                    perm: None,
                    uid: None,
                    gid: None,
                    size: None,
                    atime: Some(SetTime::Now),
                    mtime: Some(SetTime::Now),
                    via_write_handle: false,
                };
                m.setattr(times).await?;
            }
        }
        FsOp::Rm { path } => {
            let (parent, name) = m.resolve_parent(u, &path).await?;
            m.unlink(u, parent.inode, &name).await?;
        }
        FsOp::Rmdir { path } => {
            let (parent, name) = m.resolve_parent(u, &path).await?;
            m.rmdir(u, parent.inode, &name).await?;
        }
        FsOp::Mv {
            from,
            to,
            noreplace,
            exchange,
        } => {
            let (src, name) = m.resolve_parent(u, &from).await?;
            let (dst, new_name) = m.resolve_parent(u, &to).await?;
            let req = RenameRequest {
                user: u.clone(),
                parent: src.inode,
                name,
                new_parent: dst.inode,
                new_name,
                flags: RenameFlags {
                    noreplace,
                    exchange,
                },
            };
            m.rename(req).await?;
        }
        FsOp::Ln {
            target,
            path,
            symbolic,
        } => {
            let (parent, name) = m.resolve_parent(u, &path).await?;
            if symbolic {
                m.symlink(u, parent.inode, &name, target.as_bytes()).await?;
            } else {
                let src = m.resolve(u, &target, false).await?;
                m.link(u, src.inode, parent.inode, &name).await?;
            }
        }
        FsOp::Readlink { path } => {
            let link = m.resolve(u, &path, false).await?;
            println!(
                "{}",
                String::from_utf8_lossy(&m.readlink(link.inode).await?)
            );
        }
        FsOp::Chmod { mode, path } => {
            let a = m.resolve(u, &path, true).await?;
            let req = SetAttrRequest {
                user: u.clone(),
                inode: a.inode,
                perm: Some(mode),
                uid: None,
                gid: None,
                size: None,
                atime: None,
                mtime: None,
                via_write_handle: false,
            };
            m.setattr(req).await?;
        }
        FsOp::Chown { owner, path } => {
            let (uid, gid) = parse_owner(&owner)?;
            let a = m.resolve(u, &path, true).await?;
            let req = SetAttrRequest {
                user: u.clone(),
                inode: a.inode,
                perm: None,
                uid,
                gid,
                size: None,
                atime: None,
                mtime: None,
                via_write_handle: false,
            };
            m.setattr(req).await?;
        }
        FsOp::Setfattr { path, name, value } => {
            let a = m.resolve(u, &path, true).await?;
            let req = SetXattrRequest {
                user: u.clone(),
                inode: a.inode,
                name: name.into_bytes(),
                value: value.into_bytes(),
                flags: XattrFlags::default(),
            };
            m.setxattr(req).await?;
        }
        FsOp::Getfattr { path, name } => {
            let a = m.resolve(u, &path, true).await?;
            match name {
                Some(name) => println!(
                    "{}",
                    String::from_utf8_lossy(&m.getxattr(u, a.inode, name.as_bytes()).await?)
                ),
                None => {
                    for n in m.listxattr(u, a.inode).await? {
                        println!("{}", String::from_utf8_lossy(&n));
                    }
                }
            }
        }
        FsOp::Statfs => {
            let s = m.statfs().await?;
            println!(
                "capacity {} bytes, used {} bytes, free {} bytes, {} inodes",
                s.capacity_bytes, s.used_bytes, s.free_bytes, s.inodes_used
            );
        }
    }
    Ok(())
}

fn parse_owner(s: &str) -> anyhow::Result<(Option<u32>, Option<u32>)> {
    let parse = |p: &str| -> anyhow::Result<Option<u32>> {
        if p.is_empty() {
            return Ok(None);
        }
        p.parse()
            .map(Some)
            .with_context(|| format!("{p:?} is not a numeric id"))
    };
    let (uid, gid) = match s.split_once(':') {
        Some((u, g)) => (parse(u)?, parse(g)?),
        None => (parse(s)?, None),
    };
    if uid.is_none() && gid.is_none() {
        bail!("owner {s:?} names neither a uid nor a gid");
    }
    Ok((uid, gid))
}

fn print_entry(name: &str, a: &Attr, long: bool) {
    if !long {
        println!("{name}");
        return;
    }
    let t = match a.file_type {
        FileType::Regular => '-',
        FileType::Directory => 'd',
        FileType::Symlink => 'l',
        FileType::Fifo => 'p',
        FileType::Socket => 's',
        FileType::CharDevice => 'c',
        FileType::BlockDevice => 'b',
    };
    println!(
        "{t}{:04o} {:>3} {:>5} {:>5} {:>12} {:>10} {name}",
        a.perm, a.nlink, a.uid, a.gid, a.size, a.inode
    );
}
