output "asg_names" {
  description = "node id → Auto Scaling group name."
  value       = { for id, g in aws_autoscaling_group.node : id => g.name }
}

output "iam_role_name" {
  description = "The nodes' IAM role (attach more policies to it for your application)."
  value       = aws_iam_role.node.name
}

output "node_user_data" {
  description = "node id → rendered user data (plain text)."
  value       = { for id, lt in aws_launch_template.node : id => base64decode(lt.user_data) }
}

output "node_ips" {
  description = "node id → fixed private IP."
  value       = { for id, eni in aws_network_interface.node : id => one(eni.private_ips) }
}

output "node_volume_ids" {
  description = "node id → data volume id."
  value       = { for id, v in aws_ebs_volume.node : id => v.id }
}

output "node_interface_ids" {
  description = "node id → fixed-IP network interface id."
  value       = { for id, eni in aws_network_interface.node : id => eni.id }
}

output "iam_actions" {
  description = "Every action the nodes' policy grants (sorted)."
  value       = module.node_policy.actions
}
