variable "app_name" {
  description = "Cluster name: names every resource and is the value of the cps:cluster tag."
  type        = string
  validation {
    # 32 at most: "<app_name>-node-" is the IAM role's name prefix (38 characters at most).
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9-]{0,31}$", var.app_name))
    error_message = "app_name: 1-32 letters, digits and dashes, starting with a letter or digit."
  }
}

variable "node_image" {
  description = "AMI of the nodes (a node may override it with node_image)."
  type        = string
}

variable "node_key_name" {
  description = "EC2 key pair for SSH; null for none (SSM Session Manager access is attached)."
  type        = string
  default     = null
}

variable "nodes" {
  description = <<-EOT
    node_id = the node's identity (unique; not an index, any order).
    node_ip = its fixed private IP, free in node_subnet_id.
    node_subnet_id = the subnet (and so the availability zone) the node lives in.
    node_image = optional AMI for this node only.
  EOT
  type = set(object({
    node_id        = string
    node_ip        = string
    node_subnet_id = string
    node_image     = optional(string)
  }))
  validation {
    condition     = length(var.nodes) == length(distinct([for n in var.nodes : n.node_id]))
    error_message = "nodes: every node_id must be unique."
  }
}

variable "node_files" {
  description = <<-EOT
    Files per node: node_files_toupload is a list of { contents = base64, destination = path },
    or { content_from = "ssm:NAME" | "secretsmanager:NAME-OR-ARN", destination = path } for a
    secret: user data is readable through the instance metadata service by any process on the
    node, so a secret is read at boot with the node's role instead (which is then allowed
    ssm:GetParameter or secretsmanager:GetSecretValue on exactly those). Written atomically by
    cps-attach after the data volume is mounted, before the hooks.
  EOT
  type = set(object({
    node_id = string
    node_files_toupload = optional(list(object({
      contents     = optional(string)
      content_from = optional(string)
      destination  = string
    })), [])
  }))
  default = []
  validation {
    condition     = alltrue(flatten([for n in var.node_files : [for f in n.node_files_toupload : (f.contents == null) != (f.content_from == null)]]))
    error_message = "node_files: each file has either contents (base64) or content_from, not both."
  }
  validation {
    condition     = alltrue(flatten([for n in var.node_files : [for f in n.node_files_toupload : f.content_from == null || can(regex("^(ssm|secretsmanager):.", f.content_from))]]))
    error_message = "node_files: content_from is ssm:PARAMETER-NAME-OR-ARN or secretsmanager:SECRET-NAME-OR-ARN."
  }
}

variable "node_secrets_kms_key_arn" {
  description = "Customer-managed KMS key ARN that encrypts the content_from parameters or secrets (the nodes get kms:Decrypt on it); null for the AWS-managed keys."
  type        = string
  default     = null
  validation {
    condition     = var.node_secrets_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/", var.node_secrets_kms_key_arn))
    error_message = "node_secrets_kms_key_arn: a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)."
  }
}

variable "node_config_script" {
  description = <<-EOT
    Base64 shell script defining configure_cluster_node and wait_for_healthy_cluster (the second
    design's contract): cps-attach runs the first once per boot and retries the second until the
    cluster is healthy. Or use configure_command / health_command.
  EOT
  type        = string
  default     = null
}

variable "configure_command" {
  description = "argv run once per boot after the files are written (instead of node_config_script)."
  type        = list(string)
  default     = []
}

variable "health_command" {
  description = "argv retried until it exits 0; the node goes InService only then."
  type        = list(string)
  default     = []
}

variable "security_groups" {
  description = "Security groups of the nodes' primary and fixed-IP interfaces."
  type        = list(string)
}

variable "instance_type" {
  type = string
}

variable "data_volume" {
  description = <<-EOT
    device_name = EC2 device name to attach the data volume as.
    type, size_in_gibs, iops, throughput_mib_per_sec = the EBS volume.
    mount_path, file_system_type (ext4, xfs, btrfs; used once, when the volume is empty),
    mount_params (mount options), mount_path_owner_user/group = how it is mounted.
    tags = extra tags for the volume.
  EOT
  type = object({
    device_name            = optional(string, "/dev/sdf")
    size_in_gibs           = number
    type                   = string
    iops                   = optional(number)
    throughput_mib_per_sec = optional(number)
    mount_path             = string
    file_system_type       = string
    mount_params           = optional(list(string), [])
    mount_path_owner_user  = string
    mount_path_owner_group = string
    tags                   = optional(map(string), {})
  })
}

variable "root_volume" {
  description = "The root volume of each node."
  type = object({
    device_name  = optional(string, "/dev/xvda")
    size_in_gibs = optional(number, 16)
    type         = optional(string, "gp3")
  })
  default = {}
}

variable "encrypted" {
  description = "Encrypt the data and root volumes (on by default)."
  type        = bool
  default     = true
}

variable "kms_key_id" {
  description = <<-EOT
    Customer-managed KMS key ARN for the volumes; null for the AWS-managed key. Its key policy
    must also let the Auto Scaling service-linked role use it (it launches the encrypted root
    volumes).
  EOT
  type        = string
  default     = null
  validation {
    condition     = var.kms_key_id == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/", var.kms_key_id))
    error_message = "kms_key_id: a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID), not a key id or alias."
  }
}

variable "asg_inservice_timeout_in_mins" {
  description = "How long cps-roll waits for each replacement to be InService and Healthy."
  type        = number
  default     = 10
}

variable "asg_lifecycle_hook_heartbeat_timeout" {
  description = "Heartbeat timeout (s) of the launching lifecycle hook; cps-attach heartbeats at a third of it."
  type        = number
  default     = 3600
}

variable "lifecycle_default_result" {
  description = "What the hook does when it times out: ABANDON (replace the node) or CONTINUE."
  type        = string
  default     = "ABANDON"
  validation {
    condition     = contains(["ABANDON", "CONTINUE"], var.lifecycle_default_result)
    error_message = "lifecycle_default_result: ABANDON or CONTINUE."
  }
}

variable "command_timeout_seconds" {
  description = "How long cps-attach retries one AWS request through throttling and outages."
  type        = number
  default     = 1800
}

variable "http_put_response_hop_limit" {
  description = "IMDSv2 hop limit (raise to 2 for containers on the node)."
  type        = number
  default     = 1
}

variable "cps_attach_source" {
  description = <<-EOT
    Where user data gets cps-attach: { url, sha256 } downloads it and verifies the checksum
    (boot fails on a mismatch); null means it is already in the image at cps_attach_path.
    For a release: url = "https://github.com/cps-project/cps/releases/download/vVERSION/cps-attach-VERSION-ARCH-linux"
    (ARCH x86_64, or aarch64 for Graviton instance types) and sha256 = that file's line in the
    release's SHA256SUMS.
  EOT
  type = object({
    url    = string
    sha256 = string
  })
  default = null
  validation {
    condition     = var.cps_attach_source == null || can(regex("^[0-9a-f]{64}$", var.cps_attach_source.sha256))
    error_message = "cps_attach_source.sha256: 64 lowercase hex digits."
  }
}

variable "cps_attach_path" {
  description = "Path of cps-attach on the node."
  type        = string
  default     = "/usr/local/bin/cps-attach"
}

variable "roll_enabled" {
  description = "Run cps-roll when a launch template changes, replacing nodes one at a time."
  type        = bool
  default     = true
}

variable "roll_command" {
  description = "The cps-roll executable on the machine running Terraform."
  type        = string
  default     = "cps-roll"
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

variable "retain_on_destroy" {
  description = <<-EOT
    Keep the data volumes and fixed-IP interfaces whatever happens to the module (on by default):
    `terraform destroy`, removing a node from nodes, or a change that would replace them fails
    the plan. false makes them deletable (a volume leaves a final snapshot, see final_snapshot).
    Changing it on an existing cluster takes a state move first (terraform/README.md, "Deleting
    the data"); a plan made without one fails rather than replace the volumes.
  EOT
  type        = bool
  default     = true
}

variable "final_snapshot" {
  description = "Snapshot a data volume before Terraform deletes it (only deletable volumes are ever deleted, see retain_on_destroy)."
  type        = bool
  default     = true
}

variable "relocation" {
  description = <<-EOT
    What cps-attach does when a node's subnet is in another zone than its data volume:
    "never" (the plan fails instead: the node would start on an empty volume) or "snapshot"
    (cps-attach snapshots the volume, creates the node's volume from it in the new zone under a
    DynamoDB lease, and retires the source). "snapshot" creates the lock table and grants the
    nodes the snapshot, lease and tag-removal actions.
  EOT
  type        = string
  default     = "never"
  validation {
    condition     = contains(["never", "snapshot"], var.relocation)
    error_message = "relocation: \"never\" or \"snapshot\"."
  }
}

variable "relocation_delete_source" {
  description = "After a relocation, delete the source volume (once its identity tag is gone) instead of leaving it retired, untagged, for you to delete. Grants ec2:DeleteVolume on the cluster's volumes that carry no node id."
  type        = bool
  default     = false
}

variable "relocation_lock_point_in_time_recovery" {
  description = "Point-in-time recovery of the relocation lock table (off: it holds leases only, and restoring old leases would be wrong)."
  type        = bool
  default     = false
}

variable "snapshots" {
  description = <<-EOT
    Scheduled snapshots of the cluster's data volumes by Data Lifecycle Manager (off when null):
    interval_hours (1, 2, 3, 4, 6, 8, 12 or 24) and retain (how many to keep per volume).
    Snapshots carry the volume's tags (cps:cluster, cps:node-id), so a node restoring its
    latest snapshot finds them.
  EOT
  type = object({
    interval_hours = number
    retain         = number
    times          = optional(list(string), ["03:00"])
  })
  default = null
  validation {
    condition     = var.snapshots == null || contains([1, 2, 3, 4, 6, 8, 12, 24], try(var.snapshots.interval_hours, 0))
    error_message = "snapshots.interval_hours: 1, 2, 3, 4, 6, 8, 12 or 24."
  }
  validation {
    condition     = var.snapshots == null || (try(var.snapshots.retain, 0) >= 1 && try(var.snapshots.retain, 0) <= 1000)
    error_message = "snapshots.retain: 1 to 1000."
  }
}
